"""Autoscaling blueprint: the per-minute scaling Lambda, capacity-floor schedules and the
Auto Scaling lifecycle-action handlers for the inference fleet.

Registered by ``app.py`` with ``app.register_blueprint(autoscaling)``. Handlers are filled in
by issue 6; this module stays light to import (no boto3 clients at import time).
"""

from chalice import Blueprint

autoscaling = Blueprint(__name__)
