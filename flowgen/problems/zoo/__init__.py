"""The built-in problems, one module per problem (registered in ``flowgen.problems.registry``).

Import the constructors from :mod:`flowgen.problems` (``from flowgen.problems
import cnn``); these modules import JAX, the package itself does not.
"""
