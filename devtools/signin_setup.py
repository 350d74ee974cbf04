"""The values docs/deploy.md's "Sign users in" steps type into Entra: the two federated credentials
of the sign-in app registration, so that neither the OAuth connection nor the app holds a secret.

    python -m devtools.signin_setup --tenant <tenant ID> --unique-identifier <any name you choose> \\
        --identity-principal <the MANAGED_IDENTITY_PRINCIPAL_ID output>

1. The Bot Service token store (the OAuth connection, "AAD v2 with Federated Credentials") signs in
   as the app: issuer `https://login.microsoftonline.com/<tenant>/v2.0`, subject
   `/eid1/c/pub/t/<tenant>/a/<token store app>/<unique identifier>` with both IDs as base64url of
   the GUID's bytes (little-endian fields, as .NET writes a Guid), audience
   `api://AzureADTokenExchange`.
2. The bot's managed identity signs the on-behalf-of exchanges as the app: same issuer, subject the
   identity's principal (object) ID.
"""

from __future__ import annotations

import argparse
import base64
import uuid

__all__ = ["TOKEN_STORE_APP", "token_store_subject"]

#: The Bot Service token store's first-party app, base64url as Entra's subject writes it.
TOKEN_STORE_APP = "9ExAW52n_ky4ZiS_jhpJIQ"
AUDIENCE = "api://AzureADTokenExchange"


def guid_base64url(guid: str) -> str:
    """A GUID as base64url of its bytes in .NET order, unpadded (Entra's `/eid1/` subjects)."""
    return base64.urlsafe_b64encode(uuid.UUID(guid).bytes_le).decode().rstrip("=")


def token_store_subject(tenant_id: str, unique_identifier: str) -> str:
    """The subject of the federated credential that lets the token store sign in as the app."""
    return f"/eid1/c/pub/t/{guid_base64url(tenant_id)}/a/{TOKEN_STORE_APP}/{unique_identifier}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tenant", required=True, help="the Entra tenant ID")
    parser.add_argument("--unique-identifier", required=True,
                        help="a name of your choosing, also given to the OAuth connection")
    parser.add_argument("--identity-principal", help="the app's managed identity's principal ID")
    args = parser.parse_args(argv)
    issuer = f"https://login.microsoftonline.com/{args.tenant}/v2.0"
    print("Federated credential 1, the Bot Service token store (scenario: Other issuer):")
    print(f"  issuer:   {issuer}\n  subject:  "
          f"{token_store_subject(args.tenant, args.unique_identifier)}\n  audience: {AUDIENCE}")
    if args.identity_principal:
        print("Federated credential 2, the app's managed identity (on-behalf-of exchanges):")
        print(f"  issuer:   {issuer}\n  subject:  {uuid.UUID(args.identity_principal)}\n"
              f"  audience: {AUDIENCE}")


if __name__ == "__main__":
    main()
