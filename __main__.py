"""`pulumi up`: the load balancer for one environment (stack), gated on host readiness."""

from infra.program import main

main()
