"""What the `model` verbs do that is more than one call into the layers below (doctor, stats,
run's chat, add); each returns data for render.py. cli.py parses, render.py prints."""
