from model_serve.cli import main

main(prog_name="model")
