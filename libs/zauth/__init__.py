"""Who may call what: signed tokens with scopes (`tokens`) and TLS certificates (`certs`).

No gRPC and no service code: services check tokens through `services.auth`, zctl issues them.
"""
