"""Fetching image URLs without SSRF: off unless enabled; then http(s) only, an optional host allowlist,
every resolved address public, the connection pinned to the address that was checked (no DNS
rebinding), no redirects, and caps on size and time."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx

from .errors import ApiError
from .settings import Settings


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def host_allowed(host: str, allowlist: list[str]) -> bool:
    if not allowlist:
        return True
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


async def resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise ApiError(400, f"image URL host {host!r} does not resolve") from None
    return sorted({info[4][0] for info in infos})


async def fetch_image(url: str, allowlist: list[str], max_bytes: int, timeout_s: float) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, "image URL must be http(s)://host/...")
    if parts.username or parts.password:
        raise ApiError(400, "image URL must not carry credentials")
    host = parts.hostname
    if not host_allowed(host, allowlist):
        raise ApiError(400, f"image URL host {host!r} is not in the allowlist")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await resolve(host, port)
    blocked = [a for a in addresses if not is_public(a)]
    if blocked or not addresses:
        raise ApiError(400, f"image URL host {host!r} resolves to a non-public address")
    pinned = addresses[0]
    literal = f"[{pinned}]" if ":" in pinned else pinned
    target = urlunsplit((parts.scheme, f"{literal}:{port}", parts.path or "/", parts.query, ""))
    headers = {"host": parts.netloc.rsplit("@", 1)[-1], "accept": "image/*"}
    # TLS still checks the certificate against the real host name (SNI), not the pinned address.
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", target, headers=headers, extensions=extensions) as response,
        ):
            if response.is_redirect:
                raise ApiError(400, "image URL redirects; redirects are not followed")
            if response.status_code != 200:
                raise ApiError(400, f"image URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ApiError(413, f"image at URL is larger than {max_bytes} bytes")
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise ApiError(413, f"image at URL is larger than {max_bytes} bytes")
            return bytes(data)
    except httpx.TimeoutException:
        raise ApiError(400, f"image URL did not answer within {timeout_s}s") from None
    except httpx.HTTPError as exc:
        raise ApiError(400, f"image URL could not be fetched ({type(exc).__name__})") from None


async def fetch_within(url: str, settings: Settings) -> bytes:
    """`fetch_image` within the settings' bounds: the allowlist, `max_body_mb` and the timeout (whether
    URLs are fetched at all is the caller's to check)."""
    max_bytes = int(settings.max_body_mb * (1 << 20))
    allowlist, timeout_s = settings.image_url_allowlist, settings.image_url_timeout_s
    return await fetch_image(url.strip(), allowlist, max_bytes, timeout_s)


async def fetch_field(url: str, field: str, settings: Settings) -> bytes:
    """The image at `url`, sent in the request's `field`, as the settings allow: a 400 naming the field
    and --allow-image-urls where URLs are off, and every refusal of `fetch_image` named by the field."""
    if not settings.allow_image_urls:
        raise ApiError(
            400,
            f"{field}: image URLs are not fetched by this server (started without --allow-image-urls); "
            "send the image's bytes (base64)",
            param=field,
        )
    try:
        return await fetch_within(url, settings)
    except ApiError as exc:
        raise ApiError(exc.status, f"{field}: {exc.message}", exc.headers, field, exc.code) from None
