"""The Open Platform (第三方平台): a component's verify ticket, its component_access_token and
every authorizer's authorizer_access_token, with the refresh tokens kept as durable state.

- crypto.py: WeChat's message encryption (signature, AES-CBC, the appid check).
- store.py: the component's files (ticket, refresh tokens, authorizer list, bookkeeping).
- clients.py: the fetches, as the refresher sees them (component token with the ticket,
  authorizer token with its refresh token, which is persisted before the token is published).
- platform.py: one component in the daemon: its refreshers, events, reconcile, import.
- callback.py: the HTTP endpoint WeChat posts the ticket and authorization events to.
"""
