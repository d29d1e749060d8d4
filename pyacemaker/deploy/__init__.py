"""How the services are deployed: `local` runs them as processes on 127.0.0.1, `podman` as containers on a
private network (images built by `images`); both record them in $PYACEMAKER_HOME/services.json."""
