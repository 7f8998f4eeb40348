"""Type stub of the compiled teomq._core.slots (slots.pyx): the core's generation-tagged slot
table. It has no Python-visible API: the dispatcher cimports it (slots.pxd)."""
