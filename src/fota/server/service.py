"""The control center's former module: ``ControlCenter`` now lives in fota.server.center, a
module per job (connection, sender, chunks, intake, keys, workgroup). Kept so that existing
imports (``from fota.server.service import ControlCenter``) go on working."""
from fota.server.center import CLIENT_ID, ControlCenter, parse_request, parse_status

__all__ = ["CLIENT_ID", "ControlCenter", "parse_request", "parse_status"]
