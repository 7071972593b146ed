"""The built-in algorithms, registered: one line each."""

from gqc_dist.algorithms import cbc, fixed, gnr, gns, gnts, goodput, mht, sbc
from gqc_dist.algorithms.spec import register

register(gnts.SPEC)
register(gns.SPEC)
register(gnr.SPEC)
register(sbc.SPEC)
register(mht.SPEC)
register(fixed.SPEC)
register(cbc.SPEC)
register(goodput.SPEC)
