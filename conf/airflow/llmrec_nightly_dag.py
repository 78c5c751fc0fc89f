"""Airflow DAG for the nightly: one SparkSubmitOperator per stage, `{{ ds }}` as the run date.

Deploy: put this file in the DAGs folder of an Airflow with
`apache-airflow-providers-apache-spark`. The Spark master and credentials live in the
Airflow connection `spark_llmrec` (Admin > Connections), never here. Paths come from the
Airflow workers' environment:

* LLMREC_HOME: a checkout (or copy) of the project: jobs/ and conf/ (default /opt/llmrec)
* LLMREC_VENV_ARCHIVE: the packed virtualenv from `make dist`, shipped to the executors
* LLMREC_DRIVER_PYTHON: the Python on the Airflow worker that has the wheel installed

Same task graph as `llmrec nightly` (llmrec_spark.pipeline.runner): clean, embed, train-als,
train-vae (a skip unless vae.enabled), train-contrastive, evaluate, recommend. A second DAG,
llmrec_weekly_evaluation, runs the refitted protocol suite (`llmrec evaluate-protocols`) on
Sundays.
`{{ ds }}` is the start of the daily data interval,
i.e. the landing date that is complete when the run starts; catchup with one active run
and depends_on_past replays missed nights oldest first, as `llmrec nightly` does.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

LLMREC_HOME = os.environ.get("LLMREC_HOME", "/opt/llmrec")
VENV_ARCHIVE = os.environ.get("LLMREC_VENV_ARCHIVE", f"{LLMREC_HOME}/dist/llmrec-venv.tar.gz")
DRIVER_PYTHON = os.environ.get("LLMREC_DRIVER_PYTHON", f"{LLMREC_HOME}/.venv/bin/python")

SPARK_CONF = {
    # Executors run the packed virtualenv, unpacked by Spark as ./environment.
    "spark.pyspark.python": "./environment/bin/python",
    "spark.pyspark.driver.python": DRIVER_PYTHON,
    "spark.executorEnv.HF_HUB_OFFLINE": "1",
    "spark.executorEnv.TRANSFORMERS_OFFLINE": "1",
}
SUBMIT = {
    "conn_id": "spark_llmrec",
    "archives": f"{VENV_ARCHIVE}#environment",
    "conf": SPARK_CONF,
    "env_vars": {"LLMREC_CONF_DIR": f"{LLMREC_HOME}/conf"},
    "verbose": False,
}

with DAG(
    dag_id="llmrec_nightly",
    description="llmrec-spark nightly: clean -> embed -> ALS -> text tower -> top-N -> evaluation",
    schedule="30 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=True,
    max_active_runs=1,
    default_args={
        "owner": "llmrec",
        "depends_on_past": True,
        "retries": 1,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=3),
    },
    tags=["llmrec", "spark"],
) as dag:
    clean = SparkSubmitOperator(
        task_id="clean",
        name="llmrec-clean-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/clean.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    embed = SparkSubmitOperator(
        task_id="embed",
        name="llmrec-embed-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/embed.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    train_als = SparkSubmitOperator(
        task_id="train-als",
        name="llmrec-train-als-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/train_als.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    train_vae = SparkSubmitOperator(
        task_id="train-vae",
        name="llmrec-train-vae-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/train_vae.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    train_contrastive = SparkSubmitOperator(
        task_id="train-contrastive",
        name="llmrec-train-contrastive-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/train_contrastive.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    recommend = SparkSubmitOperator(
        task_id="recommend",
        name="llmrec-recommend-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/recommend.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
    evaluate = SparkSubmitOperator(
        task_id="evaluate",
        name="llmrec-evaluate-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/evaluate.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )

    clean >> embed >> train_als >> train_vae >> train_contrastive >> evaluate >> recommend


with DAG(
    dag_id="llmrec_weekly_evaluation",
    description="llmrec-spark weekly: the refitted protocol suite (evaluate-protocols)",
    schedule="0 6 * * 0",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "llmrec",
        "retries": 1,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=4),
    },
    tags=["llmrec", "spark"],
) as weekly:
    evaluate_protocols = SparkSubmitOperator(
        task_id="evaluate-protocols",
        name="llmrec-evaluate-protocols-{{ ds }}",
        application=f"{LLMREC_HOME}/jobs/evaluate_protocols.py",
        application_args=["--ds", "{{ ds }}", "--env", "cluster"],
        **SUBMIT,
    )
