"""Adopting VMs made elsewhere: libvirt domains and OVF appliances.

Pure parsers of hostile documents (:mod:`.libvirt`, :mod:`.ovf`, the OVA
rules of :mod:`.ova`) that each produce one :class:`.plan.AdoptionPlan`: what
ferry will make of the VM, and what it leaves behind. The host side
(:mod:`ferry.host.adopt`) checks the plan against the host's files and
networks, converts the disks and registers the VM.
"""
