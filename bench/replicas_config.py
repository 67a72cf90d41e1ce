"""Render deploy/haproxy.cfg for replicas on loopback, without Docker.

deploy/haproxy.cfg finds its servers through Docker's DNS (``server-template ... resolvers
docker``). Each backend's server lines sit between a ``# servers:begin`` and a
``# servers:end`` line; :func:`render_loopback` replaces every such block with one
``server rN 127.0.0.1:PORT check`` line per port, so the same frontends, backends, health
checks, retries and timeouts run against servers started on this machine (bench/replicas.py).
"""

from __future__ import annotations

import re

BEGIN_MARKER = "# servers:begin"
END_MARKER = "# servers:end"
LISTEN_BIND = "bind :8000"  # the API frontend's bind line in deploy/haproxy.cfg
STATS_BIND = "bind :8404"  # the stats frontend's bind line

# From a begin marker line to the first end marker line after it, both whole lines.
_BLOCK = re.compile(
    rf"^(?P<indent>[ \t]*){re.escape(BEGIN_MARKER)}[ \t]*\n"
    rf".*?^[ \t]*{re.escape(END_MARKER)}[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def _replace_bind(cfg_text: str, bind: str, port: int) -> str:
    """Replace the one line that is exactly ``bind`` (indentation aside) with a loopback bind."""
    pattern = re.compile(rf"^(?P<indent>[ \t]*){re.escape(bind)}[ \t]*$", re.MULTILINE)
    rendered, count = pattern.subn(lambda m: f"{m['indent']}bind 127.0.0.1:{port}", cfg_text)
    if count != 1:
        raise ValueError(f"expected exactly one {bind!r} line, found {count}")
    return rendered


def render_loopback(
    cfg_text: str,
    ports: list[int],
    *,
    listen_port: int | None = None,
    stats_port: int | None = None,
) -> str:
    """Return ``cfg_text`` with its servers replaced by loopback servers on ``ports``.

    Every block from a ``# servers:begin`` line to the next ``# servers:end`` line (both
    included) becomes ``server r1 127.0.0.1:PORTS[0] check``, ``server r2 ...`` and so on, in
    the order of ``ports``, indented like the begin marker; the markers stay around the new
    lines, so the servers of the result can be replaced again. Nothing else changes unless
    ``listen_port`` or ``stats_port`` is given: then the ``bind :8000`` (API) or ``bind :8404``
    (stats) line becomes ``bind 127.0.0.1:PORT``.

    Pure: no I/O. Raises ``ValueError`` if ``ports`` is empty or holds a value outside
    1-65535, if ``cfg_text`` has no marked block, or if a requested bind line is not there
    exactly once.
    """
    if not ports:
        raise ValueError("ports must not be empty")
    for port in ports:
        if not 1 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")

    def block(match: re.Match[str]) -> str:
        indent = match["indent"]
        lines = [f"{indent}{BEGIN_MARKER}"]
        lines += [f"{indent}server r{i} 127.0.0.1:{port} check" for i, port in enumerate(ports, 1)]
        lines.append(f"{indent}{END_MARKER}")
        return "\n".join(lines)

    rendered, count = _BLOCK.subn(block, cfg_text)
    if count == 0:
        raise ValueError(f"no {BEGIN_MARKER!r} ... {END_MARKER!r} block in the config")
    if listen_port is not None:
        rendered = _replace_bind(rendered, LISTEN_BIND, listen_port)
    if stats_port is not None:
        rendered = _replace_bind(rendered, STATS_BIND, stats_port)
    return rendered
