"""Shared wire contract of the fleet telemetry system."""

from .config import BUILTIN_TYPES, Config, MqttConfig, load_config
from .errors import ConfigError, ContractError, FleetError
from .messages import (
    ERROR_CODES,
    Request,
    Response,
    Status,
    decode_object,
    parse_request,
    parse_response,
    parse_status,
)
from .timefmt import iso, new_id, now_iso, parse_iso
from .topics import ParsedTopic, Topics, check_agent_id, check_type, sanitise_agent_id
from .version import dist_version

__version__ = dist_version("fleet-common")

__all__ = [
    "BUILTIN_TYPES", "ERROR_CODES", "Config", "ConfigError", "ContractError", "FleetError",
    "MqttConfig", "ParsedTopic", "Request", "Response", "Status", "Topics", "check_agent_id",
    "check_type", "decode_object", "iso", "load_config", "new_id", "now_iso", "parse_iso",
    "parse_request", "parse_response", "parse_status", "sanitise_agent_id",
]
