"""The entry points: the flow, its command line, the sweep, the deployment and its notices."""
