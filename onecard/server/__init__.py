"""gRPC servicers, configuration and the process entry point; no business rules."""
