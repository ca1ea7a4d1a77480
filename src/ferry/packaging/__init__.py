"""Files ferry ships for installing it on a host: the agent's systemd unit.

``ferry agent --print-unit > /etc/systemd/system/ferry-agent.service`` puts it
in place (docs/install.md).
"""

from __future__ import annotations

from importlib import resources

AGENT_UNIT = "ferry-agent.service"


def agent_unit() -> str:
    """The text of the agent's systemd unit, as packaged."""
    return resources.files(__package__).joinpath(AGENT_UNIT).read_text()
