"""Operator policies, apart from the data path: they read figures and set controls.

audit (who changed what), causes (what each error kind and drop reason means, and which
guard answers it), guards (halt rules), ramp (the sample-rate schedule), autopilot (runs
both), readiness (the migration verdict), report (the what-if report), saturation (the
shadow worker's CPU), timeline (the console's history), reload (config hot reload),
control_api (the HTTP API and console routes) and operations (their wiring into
`memshadow serve`).
"""
