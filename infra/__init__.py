"""The load balancer half: the Pulumi component and the gate's inputs."""
