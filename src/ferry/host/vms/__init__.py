"""A host's VMs.

The store-facing service the API and other services call (``service``), the
typed input of a new VM (``requests``) and the files it gets (``files``); the
QEMU processes, their watchers and re-attaching (``process``); refreshing a
VM to a fresh QEMU (``refresh``); and the one writer of VM states
(``states``), through which every state change on the host goes.
"""
