"""What talks to the server: terminal SDK and simulator, service-desk CLI."""
