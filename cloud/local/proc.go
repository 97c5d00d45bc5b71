package local

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// envMarker names the variable every process of an instance inherits. It
// finds the processes that left the instance's process group.
const envMarker = "HANGAR_LOCAL_INSTANCE_ID"

// rootEnv names the variable that holds the instance's root directory.
const rootEnv = "HANGAR_ROOT"

// bootScript is what every boot of an instance runs, as `bash -c bootScript
// hangar-boot DELAY SSHD SSHDIR STEP...`. It sleeps through the boot delay in
// the instance's own process, so a server restart during the delay does not
// lose the boot. Then, for an instance with a key pair (SSHD is not empty),
// it starts sshd in the background, waits until it listens and prints its
// host key the way cloud-init does on EC2's console, which is where the
// staging engine pins it from. Then it runs the steps in order. Nothing is
// interpolated into it: paths and the delay are arguments.
const bootScript = `sleep "$1" || exit
sshd=$2 sshdir=$3
shift 3
if [ -n "$sshd" ]; then
	log=$sshdir/sshd.log
	[ -e "$log" ] && mv -f "$log" "$log.1"
	"$sshd" -D -e -f "$sshdir/sshd_config" -E "$log" </dev/null &
	pid=$! i=0
	until grep -q 'Server listening on' "$log" 2>/dev/null; do
		if ! kill -0 "$pid" 2>/dev/null; then
			echo "hangar-local: sshd exited at start:"; tail -n 5 "$log"; pid=
			break
		fi
		i=$((i + 1))
		if [ "$i" -ge 400 ]; then
			echo "hangar-local: sshd is not listening after 20s:"; tail -n 5 "$log"; pid=
			break
		fi
		sleep 0.05
	done
	if [ -n "$pid" ]; then
		echo "-----BEGIN SSH HOST KEY KEYS-----"
		cat "$sshdir/ssh_host_ed25519_key.pub"
		echo "-----END SSH HOST KEY KEYS-----"
	fi
fi
for step do
	case $step in
	*.sh) bash "$step" || echo "hangar-local: $step exited with status $?" ;;
	*) cat "$step" ;;
	esac
done`

// boot starts the instance's processes in a new session and records its
// process group in r.
func (p *Provider) boot(r *record, delay time.Duration) error {
	dir := p.store.instanceDir(r.ID)
	ents, err := os.ReadDir(filepath.Join(dir, "parts"))
	if err != nil {
		return fmt.Errorf("booting %s: %w", r.ID, err)
	}
	sshd, sshdir := "", ""
	if r.KeyName != "" {
		sshd, sshdir = sshdPath, filepath.Join(dir, "ssh")
	}
	args := []string{"-c", bootScript, "hangar-boot", strconv.FormatFloat(delay.Seconds(), 'f', -1, 64), sshd, sshdir}
	for _, e := range ents { // ReadDir sorts by name, which is step order
		args = append(args, filepath.Join(dir, "parts", e.Name()))
	}
	console, err := os.OpenFile(filepath.Join(dir, "console.log"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("booting %s: %w", r.ID, err)
	}
	defer func() { _ = console.Close() }() // the child holds its own copy
	_, _ = fmt.Fprintf(console, "hangar-local: booting %s at %s, user-data starts after %s\n",
		r.ID, p.now().UTC().Format(time.RFC3339), delay)

	cmd := exec.Command(p.bash, args...)
	cmd.Dir = filepath.Join(dir, "disk")
	// Only what an instance needs: the server's environment may hold secrets.
	cmd.Env = []string{
		"PATH=" + p.path,
		"HOME=" + cmd.Dir,
		"LANG=C.UTF-8",
		// Temporary files stay on the instance's disk and go with it.
		"TMPDIR=" + cmd.Dir,
		// This "instance" is the host: its cloud-init directories are not
		// the instance's to install per-boot scripts into.
		"HANGAR_USERDATA_CLOUD_DIR=",
		"HANGAR_METADATA_URL=" + p.MetadataURL() + "/" + r.MetadataKey,
		envMarker + "=" + r.ID,
		// What "/" is to a real machine: the staging engine puts its
		// mount points under it. ssh sessions get it too (sshd_config).
		rootEnv + "=" + cmd.Dir,
	}
	cmd.Stdout, cmd.Stderr = console, console
	// A session of its own: the instance outlives the server and its
	// terminal, and its processes can be found by group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("booting %s: %w", r.ID, err)
	}
	go func() { _ = cmd.Wait() }() // reap; the instance's fate is read from /proc, not from here
	r.PGID = cmd.Process.Pid
	if st, err := readStat(r.PGID); err == nil {
		r.LeaderStart = st.start
	}
	return nil
}

type procStat struct {
	state byte
	pgrp  int
	start uint64 // clock ticks after boot
}

func readStat(pid int) (procStat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	// The command name may hold spaces and parentheses: fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return procStat{}, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	pgrp, err1 := strconv.Atoi(f[2])
	start, err2 := strconv.ParseUint(f[19], 10, 64)
	if err1 != nil || err2 != nil || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	return procStat{state: f[0][0], pgrp: pgrp, start: start}, nil
}

// instanceProcs returns the living processes of each instance: those in the
// process group of its boot, those that carry its environment marker (which
// catches children that called setsid and double-forked, and the shells of
// ssh sessions), and those holding a TCP socket on its sshd's address. The
// last are sshd's own: each connection gets a session of its own, and sshd
// writes its process titles over its environment, marker and all. Zombies
// are dead already and are left to their parents.
func instanceProcs(recs []*record) map[string][]int {
	groups := map[int]string{}
	markers := map[string]string{}
	sshAddrs := map[string]string{}
	for _, r := range recs {
		markers[envMarker+"="+r.ID] = r.ID
		if r.KeyName != "" && r.PrivateIP != "" {
			sshAddrs[net.JoinHostPort(r.PrivateIP, strconv.Itoa(sshPort))] = r.ID
		}
		if r.PGID <= 0 {
			continue
		}
		// A living leader with another start time means the group number was
		// reused after the instance's group died out: not ours.
		if st, err := readStat(r.PGID); err == nil && st.start != r.LeaderStart {
			continue
		}
		groups[r.PGID] = r.ID
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	sockets := socketsOn(sshAddrs)
	self := os.Getpid()
	out := map[string][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		st, err := readStat(pid)
		if err != nil || st.state == 'Z' || st.state == 'X' {
			continue
		}
		if id, ok := groups[st.pgrp]; ok {
			out[id] = append(out[id], pid)
			continue
		}
		if id, ok := markedWith(pid, markers); ok {
			out[id] = append(out[id], pid)
			continue
		}
		if id, ok := holdsSocket(pid, sockets); ok {
			out[id] = append(out[id], pid)
		}
	}
	return out
}

// markedWith returns the instance whose marker is in pid's environment.
func markedWith(pid int, markers map[string]string) (string, bool) {
	env, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return "", false
	}
	for kv := range bytes.SplitSeq(env, []byte{0}) {
		if id, ok := markers[string(kv)]; ok {
			return id, true
		}
	}
	return "", false
}

// holdsSocket returns the instance one of pid's descriptors is a socket of.
func holdsSocket(pid int, sockets map[string]string) (string, bool) {
	if len(sockets) == 0 {
		return "", false
	}
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	fds, err := os.ReadDir(dir)
	if err != nil {
		return "", false
	}
	for _, fd := range fds {
		if link, err := os.Readlink(dir + "/" + fd.Name()); err == nil {
			if id, ok := sockets[link]; ok {
				return id, true
			}
		}
	}
	return "", false
}

// socketsOn maps the TCP sockets bound to the given local addresses
// ("ip:port" → instance id), listening or connected, to their instances,
// keyed as /proc/PID/fd links show them: "socket:[INODE]".
func socketsOn(addrs map[string]string) map[string]string {
	if len(addrs) == 0 {
		return nil
	}
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil
	}
	out := map[string]string{}
	for i, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if i == 0 || len(f) < 10 || f[9] == "0" {
			continue // the header, or a socket no process holds (TIME_WAIT)
		}
		addr, ok := parseProcNetAddr(f[1])
		if !ok {
			continue
		}
		if id, ok := addrs[addr]; ok {
			out["socket:["+f[9]+"]"] = id
		}
	}
	return out
}

// parseProcNetAddr reads an IPv4 "ADDR:PORT" of /proc/net/tcp: the address
// is the 32-bit word as it lies in memory, printed in hex; the port is in
// host order.
func parseProcNetAddr(s string) (string, bool) {
	a, p, ok := strings.Cut(s, ":")
	if !ok || len(a) != 8 {
		return "", false
	}
	word, err1 := strconv.ParseUint(a, 16, 32)
	port, err2 := strconv.ParseUint(p, 16, 16)
	if err1 != nil || err2 != nil {
		return "", false
	}
	ip := make(net.IP, 4)
	binary.NativeEndian.PutUint32(ip, uint32(word))
	return net.JoinHostPort(ip.String(), strconv.FormatUint(port, 10)), true
}

// endProcesses ends every process of the instances: SIGTERM, up to grace for
// them to exit (less if ctx ends first), then SIGKILL until none is left. It
// rescans each round because a dying process may still fork. It returns how
// many processes of each instance outlived all that.
func endProcesses(ctx context.Context, recs []*record, grace time.Duration) map[string]int {
	const killFor = 5 * time.Second
	termUntil := time.Now().Add(grace)
	var killUntil time.Time
	termed := map[int]bool{}
	for {
		procs := instanceProcs(recs)
		if len(procs) == 0 {
			return nil
		}
		now := time.Now()
		if killUntil.IsZero() && (now.After(termUntil) || ctx.Err() != nil) {
			killUntil = now.Add(killFor)
		}
		if !killUntil.IsZero() && now.After(killUntil) {
			left := map[string]int{}
			for id, pids := range procs {
				left[id] = len(pids)
			}
			return left
		}
		for _, pids := range procs {
			for _, pid := range pids {
				switch {
				case !killUntil.IsZero():
					_ = syscall.Kill(pid, syscall.SIGKILL)
				case !termed[pid]:
					termed[pid] = true
					_ = syscall.Kill(pid, syscall.SIGTERM)
					_ = syscall.Kill(pid, syscall.SIGCONT) // a stopped process would not see the TERM
				}
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}
