/*
 * vibatch's SPANK plugin for Slurm 22.05: every task of every step of a job runs in the job's VM.
 *
 * plugstack.conf (root's; on the nodes and wherever srun/salloc/sbatch run):
 *   required /opt/vibatch/lib/vibatch_spank.so [python=PATH] [config=PATH]
 *
 * slurmstepd calls slurm_spank_task_init in each task's own process, as the job's user, after
 * Slurm has built the task's environment and before the site's TaskProlog, the user's
 * --task-prolog and the execve of the task (src/slurmd/slurmstepd/task.c, exec_task). Here
 * the task's process becomes vibatch's forwarder instead:
 *
 *   PYTHON -I -B -m vibatch.batch.slurm --config CONFIG task FD JOBID batch|step -- ARGV...
 *
 * - JOBID is Slurm's (S_JOB_ID), never the task's environment: a step reaches its own job's VM
 *   only.
 * - The forwarder gets a fixed environment (PATH, and slurmstepd's own SLURM_CONF): the task's
 *   environment (the user's, with --export) could otherwise steer the host's dynamic loader
 *   (LD_PRELOAD, LD_AUDIT, GCONV_PATH, ...) and run the user's code on the host. The task's
 *   environment is handed over as data, NUL-separated, in a memfd (FD), for the guest.
 * - The batch step goes the same way (its ARGV is the spooled script; job_submit.lua rewrote
 *   its first line); the extern step has no task. Every other step, interactive ones (srun
 *   --pty, salloc's interactive step) included, is forwarded.
 * - If the forwarder cannot be started the task fails (a non-zero return makes slurmstepd exit
 *   the task); nothing runs on the host instead.
 *
 * There is nothing for a user to switch off: the plugin has no options, and the task's own
 * environment is read only as data.
 *
 * The extern step (PrologFlags=Contain) holds the VM's processes, for Slurm's accounting and
 * suspend (vibatch/core/adopt.py). slurmstepd keeps it while its one task, a `sleep`, lives, and
 * SIGKILLs everything in the step's cgroup once that task is gone (mgr.c,
 * _spawn_job_container). At scancel or the time limit slurmd sends SIGTERM to every step at
 * once: the sleep would end at once, and the VM with it, before the job's own trap in the guest
 * had run. So, in the extern step's slurmstepd (root), slurm_spank_task_post_fork starts a
 * keeper thread that gives the guest the grace a job on the host gets (KillWait):
 *
 * - it forks a canary, a child of slurmstepd in the step's freezer cgroup, which Slurm signals as
 *   a task of the step (proctrack/cgroup signals the stepd's children with every signal, the
 *   other processes of the cgroup only with SIGKILL). The canary ignores every signal but
 *   SIGTERM and SIGKILL;
 * - it moves the sleep into the job's freezer cgroup (one level up), so Slurm's SIGTERM no longer
 *   reaches it;
 * - when the canary dies (the job's termination), it waits until no other step of the job has a
 *   process left (the batch step ends when the job's trap in the guest has run; slurmd SIGKILLs
 *   every step after KillWait), then SIGKILLs the sleep: slurmstepd goes on as before, takes
 *   its last accounting sample and SIGKILLs the VM.
 *
 * If any of this cannot be set up (no cgroup v1 freezer, an unexpected layout), the sleep is left
 * where Slurm put it, so Slurm behaves as without the keeper (the VM ends at SIGTERM). After
 * KEEP_MAX_S the sleep is given back to the step's cgroup, for Slurm's own handling.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(vibatch, 1);

/* Kernel headers older than 5.3 / 5.9 (RHEL 8, Ubuntu 20.04) lack these. Since Linux 5.1 a new
 * system call has one number in the common table (424, 434, 436 here), which x86_64, aarch64,
 * ppc64le and s390x use as it is; alpha, MIPS and ia64 offset it and x32 sets a bit, so there
 * the fallback is refused at build time. On a kernel without them the calls fail with ENOSYS:
 * close_range is then done by a loop, and without pidfd_open the keeper is not started (the VM
 * ends at SIGTERM, as without the plugin's keeper). */
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#define VIBATCH_SYSCALL_FALLBACK
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#define VIBATCH_SYSCALL_FALLBACK
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#define VIBATCH_SYSCALL_FALLBACK
#endif
#if defined(VIBATCH_SYSCALL_FALLBACK) && (defined(__alpha__) || defined(__mips__) || \
	defined(__ia64__) || (defined(__x86_64__) && defined(__ILP32__)))
#error "these kernel headers lack pidfd_open or close_range, and this ABI numbers them otherwise"
#endif

#define PATH_MAX_LEN 1024
#define FIXED_PATH "PATH=/usr/sbin:/usr/bin:/sbin:/bin"

static char python[PATH_MAX_LEN] = "/opt/vibatch/venv/bin/python";
static char config[PATH_MAX_LEN] = "/etc/vibatch/vibatch.yaml";

static int set_option(const char *arg)
{
	char *dest = NULL;
	const char *value = NULL;

	if (strncmp(arg, "python=", 7) == 0) {
		dest = python;
		value = arg + 7;
	} else if (strncmp(arg, "config=", 7) == 0) {
		dest = config;
		value = arg + 7;
	}
	if (dest == NULL || value[0] != '/' || strlen(value) >= PATH_MAX_LEN) {
		slurm_error("vibatch: bad plugstack.conf argument '%s' (python=/PATH or config=/PATH)",
			    arg);
		return -1;
	}
	strcpy(dest, value);
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	(void) sp;
	for (int i = 0; i < ac; i++)
		if (set_option(av[i]) < 0)
			return -1;
	return 0;
}

/* The task's environment, NUL-separated, in an anonymous file the forwarder reads. */
static int env_fd(char **env)
{
	int fd = memfd_create("vibatch-task-env", 0);   /* no CLOEXEC: the forwarder reads it */

	if (fd < 0)
		return -1;
	for (char **e = env; e && *e; e++) {
		size_t len = strlen(*e) + 1, done = 0;
		while (done < len) {
			ssize_t n = write(fd, *e + done, len - done);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				close(fd);
				return -1;
			}
			done += (size_t) n;
		}
	}
	if (lseek(fd, 0, SEEK_SET) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static void fail(const char *what)
{
	/* the task's stderr is the step's: the user sees why the step did not run */
	dprintf(2, "vibatch: this step cannot run in the job's VM: %s: %s\n", what, strerror(errno));
	slurm_error("vibatch: %s: %m", what);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	uint32_t job_id = 0, step_id = 0;
	int argc = 0, fd;
	char **argv = NULL, **env = NULL, **nargv;
	char fdbuf[16], jobbuf[16], conf_env[PATH_MAX_LEN + 16];
	char *nenv[3];
	int n = 0, e = 0;
	const char *slurm_conf;

	(void) ac;
	(void) av;
	if (!spank_remote(sp))
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) {
		errno = EINVAL;
		fail("cannot read the task from Slurm");
		return -1;
	}
	if (step_id == SLURM_EXTERN_CONT)
		return 0;
	if (argc < 1 || argv == NULL || argv[0] == NULL) {
		errno = EINVAL;
		fail("the step has no command");
		return -1;
	}
	fd = env_fd(env);
	if (fd < 0) {
		fail("cannot hand the task's environment over");
		return -1;
	}
	snprintf(fdbuf, sizeof(fdbuf), "%d", fd);
	snprintf(jobbuf, sizeof(jobbuf), "%u", job_id);

	nargv = calloc((size_t) argc + 16, sizeof(char *));
	if (nargv == NULL) {
		fail("out of memory");
		return -1;
	}
	nargv[n++] = python;
	nargv[n++] = "-I";
	nargv[n++] = "-B";
	nargv[n++] = "-m";
	nargv[n++] = "vibatch.batch.slurm";
	nargv[n++] = "--config";
	nargv[n++] = config;
	nargv[n++] = "task";
	nargv[n++] = fdbuf;
	nargv[n++] = jobbuf;
	nargv[n++] = step_id == SLURM_BATCH_SCRIPT ? "batch" : "step";
	nargv[n++] = "--";
	for (int i = 0; i < argc; i++)
		nargv[n++] = argv[i];
	nargv[n] = NULL;

	/* slurmstepd's own environment (from slurmd, root's), not the task's */
	nenv[e++] = FIXED_PATH;
	slurm_conf = getenv("SLURM_CONF");
	if (slurm_conf && slurm_conf[0] == '/' && strlen(slurm_conf) < PATH_MAX_LEN) {
		snprintf(conf_env, sizeof(conf_env), "SLURM_CONF=%s", slurm_conf);
		nenv[e++] = conf_env;
	}
	nenv[e] = NULL;

	execve(python, nargv, nenv);
	fail(python);
	return -1;
}

/* ---- the extern step's keeper (see the head of this file) ---- */

#define KEEP_MAX_S (7 * 24 * 3600)      /* then the sleep goes back to Slurm's handling */
#define LINE_MAX_LEN 4096

static pthread_t keeper;
static int keeper_started;
static volatile int canary_fd = -1;    /* the canary's pidfd: slurmstepd may reap it too */

struct keep {
	pid_t sleep_pid;
	char rel[PATH_MAX];             /* the freezer cgroup of the extern step */
	char step_dir[PATH_MAX];        /* ... its directory */
	char job_dir[PATH_MAX];         /* ... and of the job, one level up */
};

/* Up to size-1 bytes of a small kernel file (procfs, cgroupfs), NUL-terminated; -1 if unreadable. */
static ssize_t read_small(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	ssize_t done = 0;

	if (fd < 0)
		return -1;
	while ((size_t) done < size - 1) {
		ssize_t n = read(fd, buf + done, size - 1 - (size_t) done);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		done += n;
	}
	close(fd);
	buf[done] = '\0';
	return done;
}

static int write_pid(const char *dir, pid_t pid)
{
	char path[PATH_MAX + 16], line[32];
	int fd, len, rc;

	if (snprintf(path, sizeof(path), "%s/cgroup.procs", dir) >= (int) sizeof(path))
		return -1;
	fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return -1;
	len = snprintf(line, sizeof(line), "%d\n", (int) pid);
	rc = write(fd, line, (size_t) len) == len ? 0 : -1;
	close(fd);
	return rc;
}

/* Where the cgroup v1 freezer hierarchy is mounted (its root, not a subtree), into mnt. */
static int freezer_mount(char *mnt, size_t size)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	int found = -1;

	if (f == NULL)
		return -1;
	while (found < 0 && getline(&line, &cap, f) > 0) {
		char root[LINE_MAX_LEN], point[LINE_MAX_LEN], fstype[64], opts[LINE_MAX_LEN];
		char *sep = strstr(line, " - "), *tok, *save = NULL;

		if (sep == NULL || strlen(line) >= LINE_MAX_LEN ||
		    sscanf(line, "%*s %*s %*s %4095s %4095s", root, point) != 2 ||
		    sscanf(sep + 3, "%63s %*s %4095s", fstype, opts) != 2)
			continue;
		if (strcmp(fstype, "cgroup") != 0 || strcmp(root, "/") != 0 || strchr(point, '\\'))
			continue;
		for (tok = strtok_r(opts, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
			if (strcmp(tok, "freezer") == 0 && strlen(point) < size) {
				strcpy(mnt, point);
				found = 0;
			}
	}
	free(line);
	fclose(f);
	return found;
}

/* pid's freezer cgroup, as a path below the mount, into path. */
static int freezer_of(pid_t pid, char *path, size_t size)
{
	char file[64], buf[LINE_MAX_LEN], *line, *save = NULL;

	snprintf(file, sizeof(file), "/proc/%d/cgroup", (int) pid);
	if (read_small(file, buf, sizeof(buf)) <= 0)
		return -1;
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;

		if (c2 && c2 - c1 - 1 == 7 && strncmp(c1 + 1, "freezer", 7) == 0 &&
		    strlen(c2 + 1) < size) {
			strcpy(path, c2 + 1);
			return 0;
		}
	}
	return -1;
}

static pid_t parent_of(pid_t pid)
{
	char file[64], buf[1024], *end;
	int ppid = -1;

	snprintf(file, sizeof(file), "/proc/%d/stat", (int) pid);
	if (read_small(file, buf, sizeof(buf)) <= 0 || (end = strrchr(buf, ')')) == NULL ||
	    sscanf(end + 1, " %*c %d", &ppid) != 1)
		return -1;
	return ppid;
}

/* Does a cgroup below dir (itself excluded), down to depth levels, hold a process? */
static int busy_below(const char *dir, int depth, const char *skip)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int busy = 0;

	if (d == NULL)
		return 0;
	while (!busy && (e = readdir(d)) != NULL) {
		char sub[PATH_MAX], procs[PATH_MAX + 16], buf[32];

		if (e->d_type != DT_DIR || e->d_name[0] == '.' ||
		    (skip && strcmp(e->d_name, skip) == 0) ||
		    snprintf(sub, sizeof(sub), "%s/%s", dir, e->d_name) >= (int) sizeof(sub))
			continue;
		snprintf(procs, sizeof(procs), "%s/cgroup.procs", sub);
		busy = read_small(procs, buf, sizeof(buf)) > 0 || (depth > 1 && busy_below(sub, depth - 1, NULL));
	}
	closedir(d);
	return busy;
}

/* A child of slurmstepd in the extern step's freezer cgroup: Slurm signals it as the step's
 * task. It ignores every signal but SIGTERM (and SIGKILL, SIGSTOP). Only async-signal-safe calls
 * after the fork: slurmstepd has threads. */
static pid_t start_canary(void)
{
	pid_t parent = getpid(), pid = fork();
	struct sigaction sa;
	sigset_t none;

	if (pid != 0)
		return pid;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	for (int sig = 1; sig < NSIG; sig++)
		if (sig != SIGKILL && sig != SIGSTOP && sig != SIGTERM)
			sigaction(sig, &sa, NULL);
	sa.sa_handler = SIG_DFL;
	sigaction(SIGTERM, &sa, NULL);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(0);
	/* slurmd waits for EOF on some of them */
	if (syscall(SYS_close_range, 0U, ~0U, 0) < 0) {
		struct rlimit rl;
		long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (1UL << 20) ?
			   (long) rl.rlim_cur : 1L << 20;

		for (long fd = 0; fd < max; fd++)
			close((int) fd);
	}
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (;;)
		pause();
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Until the process of the pidfd has ended; then reaped, unless slurmstepd reaped it. */
static void wait_gone(int pidfd, pid_t pid)
{
	struct pollfd p = { .fd = pidfd, .events = POLLIN };

	while (poll(&p, 1, -1) < 0 && errno == EINTR)
		;
	waitpid(pid, NULL, WNOHANG);
}

static void *keep_extern(void *arg)
{
	struct keep *k = arg;
	char path[PATH_MAX];
	int pidfd = (int) syscall(SYS_pidfd_open, k->sleep_pid, 0), status;
	pid_t canary;
	double start;

	if (pidfd < 0 || parent_of(k->sleep_pid) != getpid()) {
		slurm_error("vibatch: the extern step's task %d is not ours: SIGTERM ends the VM",
			    (int) k->sleep_pid);
		goto out;
	}
	canary = start_canary();
	if (canary < 0) {
		slurm_error("vibatch: no canary for the extern step (%m): SIGTERM ends the VM");
		goto out;
	}
	/* slurmstepd's own wait for its tasks (wait3 of any child) may reap the canary: it is
	 * signalled and waited for through its pidfd, never by a pid that could be reused */
	canary_fd = (int) syscall(SYS_pidfd_open, canary, 0);
	if (canary_fd < 0) {
		slurm_error("vibatch: no pidfd for the canary (%m): SIGTERM ends the VM");
		kill(canary, SIGKILL);  /* our child, alive: it ignores all but TERM and KILL */
		waitpid(canary, &status, 0);
		goto out;
	}
	/* into the step's cgroup, as Slurm adds its task (the stepd itself may be elsewhere) */
	path[0] = '\0';
	if (write_pid(k->step_dir, canary) < 0 || freezer_of(canary, path, sizeof(path)) < 0 ||
	    strcmp(path, k->rel) != 0 || write_pid(k->job_dir, k->sleep_pid) < 0) {
		slurm_error("vibatch: cannot keep the extern step past SIGTERM (%m; canary in '%s', "
			    "task in '%s'): SIGTERM ends the VM", path, k->rel);
		write_pid(k->step_dir, k->sleep_pid);
		syscall(SYS_pidfd_send_signal, canary_fd, SIGKILL, NULL, 0);
		wait_gone(canary_fd, canary);
		goto out;
	}
	slurm_debug("vibatch: extern task %d kept out of Slurm's SIGTERM, canary %d",
		    (int) k->sleep_pid, (int) canary);
	wait_gone(canary_fd, canary);
	/* the job is ending: the VM stays while another step of the job has a process */
	start = now();
	for (;;) {
		struct pollfd p = { .fd = pidfd, .events = POLLIN };
		double waited = now() - start;

		if (!busy_below(k->job_dir, 2, "step_extern")) {
			syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
			slurm_info("vibatch: the job's other steps have ended after %.1f s: "
				   "extern step ends", waited);
			break;
		}
		if (waited > KEEP_MAX_S) {
			slurm_error("vibatch: the job's steps still run after %d s: the extern task "
				    "goes back to Slurm", KEEP_MAX_S);
			if (write_pid(k->step_dir, k->sleep_pid) < 0) {
				/* where Slurm cannot end it, the job would stay COMPLETING */
				slurm_error("vibatch: cannot give the extern task back (%m): "
					    "SIGKILLed");
				syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, NULL, 0);
			}
			break;
		}
		if (poll(&p, 1, waited < 10 ? 100 : 1000) > 0)
			break;          /* the task is gone: slurmstepd goes on by itself */
	}
out:
	if (pidfd >= 0)
		close(pidfd);
	free(k);
	return NULL;
}

/* In the extern step's slurmstepd, just after it forked its task (the caller's thread is the
 * one that forked it: its only child is the task). */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
	uint32_t step_id = 0;
	char file[64], buf[64], mnt[PATH_MAX], rel[PATH_MAX], *end;
	struct keep *k;
	long pid;

	(void) ac;
	(void) av;
	if (!spank_remote(sp) || getuid() != 0 ||
	    spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS ||
	    step_id != SLURM_EXTERN_CONT || keeper_started)
		return 0;
	snprintf(file, sizeof(file), "/proc/self/task/%ld/children", (long) syscall(SYS_gettid));
	if (read_small(file, buf, sizeof(buf)) <= 0 || (pid = strtol(buf, &end, 10)) <= 0 ||
	    strspn(end, " \n") != strlen(end)) {
		slurm_info("vibatch: the extern step's task is not the stepd's only child: "
			   "SIGTERM ends the VM");
		return 0;
	}
	if (freezer_mount(mnt, sizeof(mnt)) < 0 || freezer_of((pid_t) pid, rel, sizeof(rel)) < 0 ||
	    (end = strrchr(rel, '/')) == NULL || strcmp(end, "/step_extern") != 0 || end == rel) {
		slurm_info("vibatch: no cgroup v1 freezer step_extern for the extern step: "
			   "SIGTERM ends the VM");
		return 0;
	}
	k = calloc(1, sizeof(*k));
	if (k == NULL)
		return 0;
	k->sleep_pid = (pid_t) pid;
	strcpy(k->rel, rel);
	if (snprintf(k->step_dir, sizeof(k->step_dir), "%s%s", mnt, rel) >= (int) sizeof(k->step_dir)) {
		free(k);
		return 0;
	}
	strcpy(k->job_dir, k->step_dir);
	*strrchr(k->job_dir, '/') = '\0';
	if (pthread_create(&keeper, NULL, keep_extern, k) != 0) {
		slurm_error("vibatch: no keeper thread for the extern step: SIGTERM ends the VM");
		free(k);
		return 0;
	}
	keeper_started = 1;
	return 0;
}

/* Before slurmstepd unloads the plugin: the keeper's code must not be running then. By now the
 * extern task has ended and Slurm has SIGKILLed the step's cgroup (the canary with it). */
int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void) sp;
	(void) ac;
	(void) av;
	if (keeper_started) {
		if (canary_fd >= 0)
			syscall(SYS_pidfd_send_signal, canary_fd, SIGKILL, NULL, 0);
		pthread_join(keeper, NULL);
		keeper_started = 0;
		if (canary_fd >= 0)
			close(canary_fd);
		canary_fd = -1;
	}
	return 0;
}
