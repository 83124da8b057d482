"""Scale-out on Ray Serve (`promptserve serve --replicas N`, extra `promptserve[ray]`): engine replicas
behind one ingress, requests routed by task. Ray is imported only when this is used."""
