"""Layer 4: model zoo loading, the command line and the demo."""
