"""zctl keys, zctl token, zctl tenant: a deployment's keys, the tokens they sign, and its tenants."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

import grpc

from zauth.tokens import DEFAULT_TENANT, ScopeError, check_scope, parse_duration, tenant_scope
from zproto import common_pb2, pageserver_pb2

from .cluster_cmds import CommandError, _cluster, _pageserver, _rpc_error, tenant_of
from .security import SecurityDir, SecurityError

def tenant_id(text: str | None) -> str:
    """--tenant: 32 lowercase hex digits (None: the default tenant)."""
    return tenant_of(argparse.Namespace(tenant=text))


def cmd_keys(args: argparse.Namespace) -> int:
    """Keys, service tokens and TLS certificates into a directory (what `zctl init` puts in security/):
    for deployments whose services do not share a repository, such as compose's `keys` volume."""
    sec = SecurityDir(Path(args.dir))
    made = sec.ensure(args.host or ())
    print(f"{'made' if made else 'kept'} keys, tokens and certificates in {sec.root}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a token signed by the repository's key."""
    sec = SecurityDir(Path(args.keys)) if args.keys else _cluster(args).security
    try:
        scopes = [check_scope(s) for s in args.scope or ()] or [tenant_scope(tenant_id(args.tenant))]
        if args.scope and args.tenant:
            scopes.append(tenant_scope(tenant_id(args.tenant)))
        ttl = parse_duration(args.ttl)
        token = sec.key().issue(args.subject, scopes, ttl=ttl or None)
    except (ScopeError, ValueError, SecurityError) as e:
        raise CommandError(str(e)) from None
    print(token)
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    tenant = tenant_id(args.id) if args.id else uuid.uuid4().hex
    try:
        _pageserver(_cluster(args)).CreateTenant(pageserver_pb2.CreateTenantRequest(
            tenant=common_pb2.TenantId(id=tenant)), timeout=10)
    except grpc.RpcError as e:
        raise _rpc_error(e, f"creating tenant {tenant}") from None
    print(tenant)
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    try:
        resp = _pageserver(_cluster(args)).ListTenants(pageserver_pb2.ListTenantsRequest(), timeout=10)
    except grpc.RpcError as e:
        raise _rpc_error(e, "listing tenants") from None
    tenants = [t.id for t in resp.tenants]
    if args.json:
        print(json.dumps([{"tenant": t, "default": t == DEFAULT_TENANT} for t in tenants]))
    else:
        for t in tenants:
            print(t + ("  (default)" if t == DEFAULT_TENANT else ""))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("keys", help="make a signing key, service tokens and TLS certificates in a directory "
                                    "(kept if there)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="a name the services are reached by, for their certificate (repeatable; localhost and "
                        "127.0.0.1 always)")
    p.set_defaults(func=cmd_keys)
    p = sub.add_parser("token", help="print a token signed by the repository's key")
    p.add_argument("--tenant", default=None, help="tenant the token reads and branches (default: the default tenant)")
    p.add_argument("--scope", action="append", metavar="SCOPE",
                   help="admin, ingest, redo or tenant:<id> (repeatable; default: tenant:<--tenant>)")
    p.add_argument("--ttl", default="24h", metavar="DURATION", help="valid for this long: 90s, 15m, 12h, 30d; "
                                                                     "0 = no expiry (default 24h)")
    p.add_argument("--keys", default=None, metavar="DIR",
                   help="sign with DIR/signing_key.pem (a `zctl keys` directory; default: the repository's)")
    p.add_argument("--subject", default="zctl-user", help="who the token is for (shows in refusal logs)")
    p.set_defaults(func=cmd_token)
    tenant = sub.add_parser("tenant", help="tenants: isolated sets of branches").add_subparsers(
        dest="tenant_command", required=True)
    p = tenant.add_parser("create", help="create a tenant (prints its id)")
    p.add_argument("id", nargs="?", default=None, help="32 hex digits (default: a new random id)")
    p.set_defaults(func=cmd_tenant_create)
    p = tenant.add_parser("list", help="the page server's tenants")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tenant_list)


__all__ = ["add_commands", "tenant_id"]
