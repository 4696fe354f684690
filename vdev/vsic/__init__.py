"""The virtual storage controller (VSIC): functions over virtual storage areas on one image.

``function`` is one application's function (registers, request rings, DMA table, limits),
``device`` the backing store and the set of functions, ``host`` the device host process.
"""
