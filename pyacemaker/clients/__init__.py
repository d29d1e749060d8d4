"""Clients of the services: what a caller (the orchestrator, the CLI, a user's script, another service) uses to
talk to a service over gRPC. They depend only on the core package and the generated protocol modules, never on
a service's own code, so that every service can be deployed and swapped on its own."""
