"""How the services are deployed: `local` runs them as processes on 127.0.0.1."""
