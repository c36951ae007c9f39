"""model_serve's benchmark suite: `python -m bench [--quick] [--only NAME,...]`.

Each benchmark builds its own isolated stack in a temp folder and measures the stack side by
side with its reference (llama-server by hand, its own port, a bare Python start-up) in the
same run. See bench/README.md for the goals and the latest figures.
"""
