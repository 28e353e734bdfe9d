"""The pure core: settings, rendering and decisions. Imports neither Pulumi nor paramiko."""
