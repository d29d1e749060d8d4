"""Container HEALTHCHECK: a grpc.health.v1 Check on this container's own port; exit 0 when SERVING.

Health is exempt from the shared token, so the probe needs none; with TLS on it uses the same
PYACEMAKER_TLS_* settings as the service (the certificate must name 127.0.0.1 or localhost, or set
PYACEMAKER_TLS_SERVER_NAME).
"""

import os
import sys

from pyacemaker.rpc import check_health

sys.exit(0 if check_health(f"127.0.0.1:{os.environ.get('PYACEMAKER_PORT', '50051')}", timeout=5.0) else 1)
