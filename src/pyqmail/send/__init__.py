"""qmail-send: preprocessing, scheduling, retries, bounces and its log."""
