"""The host half: `fab` tasks that render, push and prove the nginx config on every host."""
