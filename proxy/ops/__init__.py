"""Operator policies, apart from the data path: they read figures and set controls.

audit (who changed what), guards (halt rules), ramp (the sample-rate schedule), autopilot
(runs both), report (the what-if report), reload (config hot reload), control_api (the HTTP
API and console routes) and operations (their wiring into `memshadow serve`).
"""
