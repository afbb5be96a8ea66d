from .comm import comm_report, reset_comm_report
from .errors import CollectiveError, CollectiveMismatch, DistributedError, PeerFailure
from .launch import destroy_distributed, init_distributed
from .mesh import Mesh
from .watchdog import report_failure

__all__ = ["Mesh", "init_distributed", "destroy_distributed", "comm_report", "reset_comm_report",
           "report_failure", "DistributedError", "PeerFailure", "CollectiveMismatch", "CollectiveError"]
