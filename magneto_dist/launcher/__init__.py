"""The fault-tolerant launcher (launch/ft_launch.py): torchrun's elastic agent plus restarts
records, hang detection that spares the agent, and no retry of errors a restart cannot fix."""
