from .comm import comm_report, reset_comm_report
from .launch import destroy_distributed, init_distributed
from .mesh import Mesh

__all__ = ["Mesh", "init_distributed", "destroy_distributed", "comm_report", "reset_comm_report"]
