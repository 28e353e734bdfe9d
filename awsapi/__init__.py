"""The AWS edge (botocore): what Parameter Store, the Classic ELB, ELBv2 and EC2 say now.

Reads, and the readiness record's store; no decision is made here (those are `core`'s). Both
halves use it: the Pulumi program (`infra/`) and the host half (`remote/`).
"""
