"""The running stack: the supervisor and its state, processes, sync, activity, memory, the
pressure unloader and model exits. Uses engines, models and config."""
