# Typed locals for bench/compiled.py's `cython-pxd` variant (Cython reads a .pxd beside a .py of the same name):
# ScopeSpend as an extension type (slot access in C), the charge loops' state typed. Money stays Python int
# (object): totals may pass 2^63 pico-USD. Measurement only: nothing ships compiled.
cimport cython

cdef class ScopeSpend:
    cdef public object period, window, events, input_tokens, output_tokens, gpu_ps, gpu, unpriced, cpu_ps
    cdef public bint dirty
    cdef public object window_key, month, up, lineage

@cython.locals(state=ScopeSpend, group=list, parent=list, above=dict)
cpdef tuple _charge_group(dict level, object late)

cdef class SpendBook:
    cdef public dict states, chains
    cdef public object store, _parked_month, late

    @cython.locals(leaf=ScopeSpend, group=list, level=dict, chains=dict)
    cpdef add_many(self, list rows)
