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
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

SPANK_PLUGIN(vibatch, 1);

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
