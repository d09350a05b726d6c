"""The SSH core: it holds no policy and acts on the plan it is given.

``frontdoor`` (listener, connection life, authentication, limits),
``channels`` (what a client opens), ``upstream`` (connect and reuse, given a
plan), ``relay`` (session and tunnel relays with flow control),
``refusal`` (the one place errors become what the person sees),
``sshd_compat`` (where asyncssh's server must behave as sshd does).
"""
