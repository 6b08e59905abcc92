"""The fleet mode: N hosts on one Redis behave like one central server, and every host's
readers still read a local file. Loaded only when the config has a ``[redis]`` table."""
