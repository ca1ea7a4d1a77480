"""``ferry web``: a browser console over the agents, a client like the CLI.

:mod:`ferry.web.app` builds the aiohttp application (its docstring lists the
element hooks the browser tests use), :mod:`ferry.web.session` the token,
cookie and CSRF rules, :mod:`ferry.web.operations` the agent calls (the CLI's),
``pages/`` one module per page, ``templates/`` what they render.
"""
