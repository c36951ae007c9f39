"""Running without a terminal: the systemd unit, launchd plist and crontab line the setup
scripts install, and the folders macOS protects from launchd and cron."""
