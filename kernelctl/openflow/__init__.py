"""OpenFlow 1.3 for the VNIC's filter table: a sans-I/O codec (``constants``, ``wire``,
``oxm``, ``actions``, ``messages``), one connection's protocol state (``connection``), the
switch model that maps OpenFlow onto kernelctl's view of the VNIC (``switch``) and the
socket side (``channel``). The modules import only those below them (an import-linter
contract in pyproject.toml).
"""
