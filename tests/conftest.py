from wallet._eth import load_eth_libraries

# first, before any test module imports them: py_ecc and py-evm would raise the recursion limit for the
# whole run, and the tests of deeply nested hostile input would overflow the C stack (wallet/_eth.py)
load_eth_libraries(evm=True)

from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)
settings.load_profile("default")
