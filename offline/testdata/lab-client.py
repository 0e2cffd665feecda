import socket, struct, time
def fetch(fam, addr, rst=False):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((addr, 8080))
    s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
    n = 0
    while True:
        time.sleep(0.03)
        d = s.recv(2000)
        if not d: break
        n += len(d)
        if rst and n > 4000:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
            break
    s.close()
fetch(socket.AF_INET, "10.99.0.2")
fetch(socket.AF_INET6, "fd99::2")
fetch(socket.AF_INET, "10.99.0.2", rst=True)
