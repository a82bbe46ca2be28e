"""Process groups and the CPU path: everything that knows about devices and ranks lives here."""
