"""The models on disk: GGUF headers, the catalog of files and their names, the plan of what is
served with which options, footprints, and Ollama's store and command. Uses config only."""
