"""`postbus domain|user|alias|mailbox|import|export`: administration through mailbox-store's
management API (httpx), never the database.

Base URL: POSTBUS_API_URL (default http://127.0.0.1:8103). Token: POSTBUS_ADMIN_TOKEN, else
the token file (POSTBUS_ADMIN_TOKEN_FILE, else <POSTBUS_RUN_DIR or .run>/admin-token).
Exit codes: 0 ok, 1 the operation failed, 2 usage.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from postbus.kit.settings import CommonSettings

DEFAULT_API_URL = "http://127.0.0.1:8103"
CHUNK = 256 * 1024
PAGE = 1000  # users per request

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

domain_app = typer.Typer(help="Domains this server receives mail for.", no_args_is_help=True)
user_app = typer.Typer(help="Mail accounts.", no_args_is_help=True)
alias_app = typer.Typer(help="Aliases: an address delivering to one or more accounts.",
                        no_args_is_help=True)
mailbox_app = typer.Typer(help="Mailboxes (folders) of an account.", no_args_is_help=True)


# ---------------------------------------------------------------- plumbing
def _token() -> str | None:
    token = os.environ.get("POSTBUS_ADMIN_TOKEN")
    if token:
        return token.strip()
    settings = CommonSettings()
    if "POSTBUS_ADMIN_TOKEN_FILE" not in os.environ and os.environ.get("POSTBUS_RUN_DIR"):
        settings.admin_token_file = Path(os.environ["POSTBUS_RUN_DIR"]) / "admin-token"
    return settings.resolved_admin_token()


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@contextmanager
def client(timeout: float = 60.0) -> Iterator[httpx.Client]:
    base = os.environ.get("POSTBUS_API_URL", DEFAULT_API_URL).rstrip("/")
    token = _token()
    if not token:
        fail("no admin token: set POSTBUS_ADMIN_TOKEN or run `postbus run` (it writes "
             ".run/admin-token)")
    try:
        with httpx.Client(base_url=base + "/api/v1", timeout=timeout,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            yield c
    except httpx.TransportError as exc:
        fail(f"cannot reach the management API at {base}: {exc or type(exc).__name__} "
             "(is mailbox-store running? set POSTBUS_API_URL)")


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:500] or r.reason_phrase
    d = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(d, list):  # FastAPI validation errors
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', [])[1:])}: {e.get('msg')}"
                         for e in d if isinstance(e, dict)) or str(d)
    return str(d)


def call(c: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    r = c.request(method, path, **kw)
    if r.status_code == 401:
        fail("the admin token was refused (401)")
    if r.status_code >= 400:
        fail(f"{r.status_code}: {_detail(r)}")
    if r.status_code == 204 or not r.content:
        return None
    return r.json()


def api(method: str, path: str, **kw: Any) -> Any:
    """One request to the management API on a connection of its own (see ``call``)."""
    with client() as c:
        return call(c, method, path, **kw)


def q(address: str) -> str:
    return quote(address, safe="@")


def parse_size(text: str) -> int | None:
    """``10G``, ``512M``, ``2.5GiB``, ``1000``, ``unlimited`` -> bytes (None = unlimited)."""
    t = text.strip().lower().replace(" ", "")
    if t in ("unlimited", "none", "-"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(i?b?)", t)
    if not m:
        raise typer.BadParameter(f"not a size: {text!r} (try 500M, 2G, unlimited)")
    mult = 1024 ** " kmgt".index(m.group(2) or " ")
    return int(float(m.group(1)) * mult)


def human(n: int | None) -> str:
    if n is None:
        return "unlimited"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def emit_json(data: Any) -> None:
    out.print_json(json.dumps(data))


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# ---------------------------------------------------------------- domains
@domain_app.command("add")
def domain_add(name: str,
               case_sensitive: Annotated[bool, typer.Option(
                   "--case-sensitive", help="Compare local parts case-sensitively.")] = False
               ) -> None:
    """Add a domain."""
    d = api("POST", "/domains", json={"name": name,
                                      "local_part_case_sensitive": case_sensitive})
    out.print(f"domain [bold]{d['name']}[/bold] added")


@domain_app.command("list")
def domain_list(as_json: JsonOpt = False) -> None:
    """List domains."""
    ds = api("GET", "/domains")
    if as_json:
        return emit_json(ds)
    t = Table("domain", "accounts", "aliases", "catch-all", "local parts")
    for d in ds:
        t.add_row(d["name"], str(d["accounts"]), str(d["aliases"]), d["catch_all"] or "-",
                  "case-sensitive" if d["local_part_case_sensitive"] else "case-insensitive")
    out.print(t)


@domain_app.command("delete")
def domain_delete(name: str,
                  force: Annotated[bool, typer.Option(
                      "--force", help="Also delete its accounts (with their mail) and aliases.")
                  ] = False) -> None:
    """Delete a domain."""
    api("DELETE", f"/domains/{quote(name)}", params={"force": force})
    out.print(f"domain [bold]{name}[/bold] deleted")


@domain_app.command("catch-all")
def domain_catch_all(name: str,
                     account: Annotated[str | None, typer.Argument(
                         help="Account that gets mail for unknown addresses.")] = None,
                     clear: Annotated[bool, typer.Option("--clear", help="Remove it.")] = False
                     ) -> None:
    """Set (or --clear) the catch-all account of a domain."""
    if (account is None) == (not clear):
        fail("give an ACCOUNT or --clear", 2)
    d = api("PATCH", f"/domains/{quote(name)}", json={"catch_all": account})
    out.print(f"catch-all of [bold]{d['name']}[/bold]: {d['catch_all'] or 'none'}")


# ---------------------------------------------------------------- users
def _password(given: str | None, prompt: bool = True) -> str:
    if given is not None:
        return given
    if not prompt or not sys.stdin.isatty():
        fail("give --password (or run in a terminal to be asked)", 2)
    return str(typer.prompt("password", hide_input=True, confirmation_prompt=True))


PasswordOpt = Annotated[str | None, typer.Option(
    "--password", "-p", envvar="POSTBUS_USER_PASSWORD",
    help="The password (asked for when omitted in a terminal).")]


def _show_user(u: dict[str, Any]) -> None:
    usage = u["usage"]
    pct = f" ({usage['percent']}%)" if usage["percent"] is not None else ""
    out.print(f"[bold]{u['address']}[/bold]  id {u['id']}  "
              f"{'enabled' if u['enabled'] else '[red]disabled[/red]'}\n"
              f"  usage   {human(usage['used_bytes'])} of {human(usage['quota_bytes'])}{pct}, "
              f"{usage['messages']} messages\n"
              f"  pop3    {u['pop3_policy']}"
              + (f", expire after {u['pop3_expire_days']} days" if u["pop3_expire_days"] else ""))


@user_app.command("add")
def user_add(address: str, password: PasswordOpt = None,
             quota: Annotated[str | None, typer.Option(help="e.g. 2G, 500M, unlimited")] = None,
             disabled: Annotated[bool, typer.Option("--disabled")] = False) -> None:
    """Create an account (with INBOX, Sent, Drafts, Trash, Junk, Archive)."""
    body: dict[str, Any] = {"address": address, "password": _password(password),
                            "enabled": not disabled}
    if quota is not None:
        body["quota_bytes"] = parse_size(quota)
    u = api("POST", "/users", json=body)
    out.print(f"account [bold]{u['address']}[/bold] created (quota {human(u['quota_bytes'])})")


@user_app.command("list")
def user_list(domain: Annotated[str | None, typer.Option(help="Only this domain.")] = None,
              as_json: JsonOpt = False) -> None:
    """List accounts with their usage."""
    params: dict[str, Any] = {"limit": PAGE, "offset": 0}
    if domain:
        params["domain"] = domain
    us: list[dict[str, Any]] = []
    with client() as c:
        while True:  # every page
            page = call(c, "GET", "/users", params=params)
            us += page
            if len(page) < PAGE:
                break
            params["offset"] += PAGE
    if as_json:
        return emit_json(us)
    t = Table("address", "enabled", "messages", "used", "quota", "pop3")
    for u in us:
        t.add_row(u["address"], "yes" if u["enabled"] else "[red]no[/red]",
                  str(u["usage"]["messages"]), human(u["usage"]["used_bytes"]),
                  human(u["quota_bytes"]), u["pop3_policy"])
    out.print(t)


@user_app.command("show")
def user_show(address: str, as_json: JsonOpt = False) -> None:
    """One account with its usage."""
    u = api("GET", f"/users/{q(address)}")
    if as_json:
        return emit_json(u)
    _show_user(u)


def _patch_user(address: str, body: dict[str, Any], what: str) -> None:
    u = api("PATCH", f"/users/{q(address)}", json=body)
    out.print(f"[bold]{u['address']}[/bold]: {what}")


@user_app.command("passwd")
def user_passwd(address: str, password: PasswordOpt = None) -> None:
    """Change an account's password."""
    _patch_user(address, {"password": _password(password)}, "password changed")


@user_app.command("disable")
def user_disable(address: str) -> None:
    """Refuse logins and mail for an account (mail is kept)."""
    _patch_user(address, {"enabled": False}, "disabled")


@user_app.command("enable")
def user_enable(address: str) -> None:
    """Allow logins and mail again."""
    _patch_user(address, {"enabled": True}, "enabled")


@user_app.command("quota")
def user_quota(address: str,
               size: Annotated[str, typer.Argument(help="e.g. 2G, 500M, unlimited")]) -> None:
    """Set an account's quota."""
    n = parse_size(size)
    _patch_user(address, {"quota_bytes": n}, f"quota {human(n)}")


@user_app.command("pop3")
def user_pop3(address: str,
              policy: Annotated[str, typer.Argument(
                  help="client: the client decides; keep: never delete; delete: always")],
              expire_days: Annotated[int | None, typer.Option(
                  min=0, help="Delete mail read over POP3 after this many days.")] = None
              ) -> None:
    """Set the POP3 retention policy of an account."""
    if policy not in ("client", "keep", "delete"):
        raise typer.BadParameter("policy must be client, keep or delete")
    _patch_user(address, {"pop3_policy": policy, "pop3_expire_days": expire_days},
                f"pop3 policy {policy}")


@user_app.command("delete")
def user_delete(address: str,
                yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False
                ) -> None:
    """Delete an account and all its mail."""
    if not yes:
        if not sys.stdin.isatty():
            fail("deleting an account deletes its mail: confirm with --yes", 2)
        typer.confirm(f"delete {address} and all its mail?", abort=True)
    api("DELETE", f"/users/{q(address)}")
    out.print(f"account [bold]{address}[/bold] deleted")


# ---------------------------------------------------------------- aliases
@alias_app.command("add")
def alias_add(address: str,
              targets: Annotated[list[str], typer.Argument(help="Accounts it delivers to.")]
              ) -> None:
    """Create an alias (`alias set` replaces the targets of an existing one)."""
    a = api("POST", "/aliases", json={"address": address, "targets": targets})
    out.print(f"alias [bold]{a['address']}[/bold] -> {', '.join(a['targets'])}")


@alias_app.command("set")
def alias_set(address: str, targets: list[str]) -> None:
    """Replace the targets of an alias."""
    a = api("PATCH", f"/aliases/{q(address)}", json={"targets": targets})
    out.print(f"alias [bold]{a['address']}[/bold] -> {', '.join(a['targets'])}")


@alias_app.command("list")
def alias_list(domain: Annotated[str | None, typer.Option()] = None,
               as_json: JsonOpt = False) -> None:
    """List aliases."""
    als = api("GET", "/aliases", params={"domain": domain} if domain else None)
    if as_json:
        return emit_json(als)
    t = Table("alias", "delivers to")
    for a in als:
        t.add_row(a["address"], ", ".join(a["targets"]))
    out.print(t)


@alias_app.command("delete")
def alias_delete(address: str) -> None:
    """Delete an alias."""
    api("DELETE", f"/aliases/{q(address)}")
    out.print(f"alias [bold]{address}[/bold] deleted")


# ---------------------------------------------------------------- mailboxes
@mailbox_app.command("list")
def mailbox_list(user: str, as_json: JsonOpt = False) -> None:
    """Mailboxes of an account with message counts and sizes."""
    bs = api("GET", f"/users/{q(user)}/mailboxes")
    if as_json:
        return emit_json(bs)
    t = Table("mailbox", "special-use", "messages", "unseen", "size")
    for b in bs:
        t.add_row(b["name"], b["special_use"] or "", str(b["messages"]), str(b["unseen"]),
                  human(b["size"]))
    out.print(t)


# ---------------------------------------------------------------- import / export
def guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir() or name.endswith((".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".zip")):
        return "maildir"
    if name.endswith(".eml"):
        return "eml"
    return "mbox"


def _pack_maildir(path: Path) -> Path:
    """A Maildir directory -> a temporary tar of its cur/ and new/ (tmp/ is never mail)."""
    fd, tmp = tempfile.mkstemp(prefix="postbus-maildir-", suffix=".tar")
    os.close(fd)
    with tarfile.open(tmp, "w") as t:
        for sub in ("cur", "new"):
            for d in sorted(path.rglob(sub)):
                if d.is_dir():
                    t.add(d, arcname=str(d.relative_to(path.parent)))
    return Path(tmp)


def _upload(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            progress.advance(task, len(chunk))
            yield chunk
    # the server stores the messages once it has the whole file: say so while we wait
    progress.update(task, description="storing messages on the server")


def import_cmd(
    user: Annotated[str, typer.Argument(help="The account to import into.")],
    file: Annotated[Path, typer.Argument(exists=True, readable=True,
                                         help="An mbox file, a Maildir (directory, tar or "
                                              "zip) or an .eml file.")],
    format: Annotated[str | None, typer.Option(
        "--format", "-f", help="mbox, maildir or eml (guessed from the name when omitted)")
    ] = None,
    mailbox: Annotated[str, typer.Option("--mailbox", "-m", help="Target mailbox.")] = "INBOX",
) -> None:
    """Import mail into an account (streamed, with a progress bar)."""
    fmt = format or guess_format(file)
    if fmt not in ("mbox", "maildir", "eml"):
        raise typer.BadParameter("--format must be mbox, maildir or eml")
    if file.is_dir() and fmt != "maildir":
        fail("a directory can only be imported as a Maildir", 2)
    upload = _pack_maildir(file) if file.is_dir() else file
    try:
        size = upload.stat().st_size
        with client(timeout=3600.0) as c, Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(), console=err,
                transient=True) as progress:
            task = progress.add_task(f"uploading {file.name}", total=size)
            rep = call(c, "POST", f"/users/{q(user)}/import",
                       params={"format": fmt, "mailbox": mailbox},
                       content=_upload(upload, progress, task),
                       headers={"Content-Length": str(size),
                                "Content-Type": "application/octet-stream"})
    finally:
        if upload != file:
            upload.unlink(missing_ok=True)
    out.print(f"imported [bold]{rep['imported']}[/bold] messages ({human(rep['bytes'])}) "
              f"into {rep['mailbox']}"
              + (f", UIDs {rep['first_uid']}-{rep['last_uid']}" if rep["first_uid"] else ""))
    if len(rep.get("mailboxes", {})) > 1:
        for name, n in sorted(rep["mailboxes"].items()):
            out.print(f"  {name}: {n}")
    for e in rep["errors"]:
        err.print(f"[yellow]skipped:[/yellow] {e}")
    if rep["stopped"]:
        fail(f"import stopped: {rep['stopped']}")
    if rep["failed"]:
        fail(f"{rep['failed']} messages were not imported")


def export_cmd(
    user: Annotated[str, typer.Argument(help="The account to export from.")],
    mailbox: Annotated[str, typer.Option("--mailbox", "-m")] = "INBOX",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write here instead of standard output.")] = None,
) -> None:
    """Export a mailbox as an mbox file (to standard output unless --output)."""
    with client(timeout=3600.0) as c, c.stream(
            "GET", f"/users/{q(user)}/export", params={"mailbox": mailbox}) as r:
        if r.status_code >= 400:
            r.read()
            fail(f"{r.status_code}: {_detail(r)}")
        sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        try:
            n = 0
            for chunk in r.iter_bytes(CHUNK):
                sink.write(chunk)
                n += len(chunk)
            sink.flush()
        finally:
            if output:
                sink.close()
    if output:
        out.print(f"exported {human(n)} to {output}")


def register(app: typer.Typer) -> None:
    """Add the administration commands to the `postbus` command."""
    app.add_typer(domain_app, name="domain")
    app.add_typer(user_app, name="user")
    app.add_typer(alias_app, name="alias")
    app.add_typer(mailbox_app, name="mailbox")
    app.command("import")(import_cmd)
    app.command("export")(export_cmd)
